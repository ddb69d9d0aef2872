"""EAGLE-3 drafter training.

data.py (regenerate responses with the target, capture aux hidden states and top-k log-probs),
ttt.py (the dense training-time-test unroll and its loss), trainer.py (stages, resume, summary),
cli_train.py (`eyas train-drafter`) and evaluate.py (`eyas eval-drafter`).
"""
