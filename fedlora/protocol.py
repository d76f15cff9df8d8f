"""Record and config keys that server and client share: the wire contract, in one place."""

from __future__ import annotations

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys sent down with each train/evaluate message
SERVER_ROUND = "server-round"
RUN_CONFIG = "run-config"  # the server's validated RunConfig as JSON: one source of defaults
RANK = "rank"
FREEZE_A = "freeze-a"
REINIT = "reinit"
INIT_SEED = "init-seed"
LABEL_NAMES = "label-names"

# MetricRecord keys sent back by clients
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_FIRST = "train-loss-first"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
