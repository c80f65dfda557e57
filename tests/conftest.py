"""The test tree mirrors the package's floors (optim/, trajectory/, adapters/, distill/, cli/);
the shared helpers live here at its root."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
