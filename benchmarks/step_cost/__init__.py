"""Cost of one outer step: time and saved bytes of MTT, SAM, SATM and the variants."""
