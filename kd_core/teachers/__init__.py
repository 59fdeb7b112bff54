"""Where a teacher's distribution comes from: the one package that decides it.

`signal`: what a method reads of the teacher for one micro-batch (dense logits or a top-k); `source`: the
`TeacherSource` interface and its kinds (a live model, the cached top-k, a model served over HTTP, several
teachers combined); `factory`: the one function that picks the kind from the config (and the one answer to
"is this teacher served by another process?"); `cache`, `cache_key`: the teacher-logit cache; `served`: the
HTTP client of a served teacher; `ensemble`: several teachers' signals combined.
"""
