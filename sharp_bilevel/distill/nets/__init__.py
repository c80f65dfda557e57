"""The networks of the trajectory-matching codebases, one module per family;
`sharp_bilevel.distill.networks` re-exports them (the import path of earlier releases)."""
