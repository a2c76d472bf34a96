"""`ovis-data demo`: the whole pipeline (get, validate, pack, train, report, chat, eval) on a built-in corpus.

Above both ovis_data and ovis_model (it drives each); neither imports it."""
