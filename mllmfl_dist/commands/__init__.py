"""The orchestrators: ``run`` (the stages in order, :mod:`.pipeline`), ``compare`` (methods x seeds, a table) and
the seed sweeps; they call the stages (:mod:`mllmfl_dist.stages`) and nothing below calls them."""
