"""The serving library: everything a recommendation needs at request time, and no web framework.

`catalog` reads one index version and searches it, `filters` turns request filters into row masks,
`gpu_search` keeps a GPU copy of the index, `towers` gets user/query vectors from Triton (or the
same TorchScript files in-process) over `http1`. The KServe adapter (retriever/), the export's
catalogue updates and the offline evaluation all build on it; it imports none of them.
"""
