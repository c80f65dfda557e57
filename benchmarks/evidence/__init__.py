"""Evidence on real images: accuracy, flatness and the lr picks, with paired intervals."""
