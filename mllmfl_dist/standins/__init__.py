"""The stand-in models: tiny random LLaVA and open_clip builders (:mod:`.tiny`), the knowledge-bearing ones trained
on the CPU from a captioned corpus (:mod:`.trained`, :mod:`.clip_train`, :mod:`.llava_train`), the miniatures, and the
captions of that corpus (:mod:`.web_captions`)."""
