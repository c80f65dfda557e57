"""The command line on top of everything: the main job (`sharp_bilevel.cli.app`, run by
``python -m sharp_bilevel``), its flag checks and the optimizer demo."""
