"""`ovis-eval`: score a model folder on benchmark files in VLMEvalKit's TSV format (multiple choice and
yes/no), with VLMEvalKit's prompts for Ovis, greedy decoding and rule-based answer extraction.

bench.py reads and checks the files, prompts.py builds the questions, extract.py reads the answers,
generate.py is the one place that asks the model, score.py runs a bench and writes its results. The
formats, prompts and scoring rules, with the VLMEvalKit sources they follow: docs/evaluation.md.
"""
