"""The MLLM side: loading LLaVA (:mod:`.llava`), captioning, the teachers' read-outs for alignment (:mod:`.teachers`,
:mod:`.clip_teacher`, :mod:`.teacher_diagnostics`) and what ``check`` reads of a model's files (:mod:`.model_files`)."""
