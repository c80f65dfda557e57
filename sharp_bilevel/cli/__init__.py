"""The command line on top of everything: the main job (`sharp_bilevel.cli.app`, run by
``python -m sharp_bilevel``), its options (common ones in `sharp_bilevel.cli.options`, one
module per family of objectives in `sharp_bilevel.cli.families`), its flag checks, its thread
choice (`sharp_bilevel.cli.threads`) and the optimizer demo."""
