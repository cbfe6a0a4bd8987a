"""dmdserve's Python tools: checkpoint conversion and bundle export (see docs/SD15.md), and the
libraries the tests, training and benchmarks share: the reference CLIP tokenizer
(clip_tokenizer_reference), the reference sampling loop (reference_pipeline) and the dmdserve
launcher (dmdserve_process)."""
