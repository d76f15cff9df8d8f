"""Record and config keys that server and client share: the wire contract, in one place."""

from __future__ import annotations

# payload keys of the base-merge stacks: "merge/<round>/<peft key>"
from fedlora.lora.base_merge import MERGE_PREFIX as MERGE_PREFIX

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys sent down with each train/evaluate message
SERVER_ROUND = "server-round"
RUN_CONFIG = "run-config"  # the server's validated RunConfig as JSON: one source of defaults
PLAN = "plan"  # this node's ClientPlan for the round, one versioned JSON text (fedlora.lora.plan)
LABEL_NAMES = "label-names"

# MetricRecord keys sent back by clients
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_FIRST = "train-loss-first"
TRAIN_SECONDS = "train-seconds"
# where a node's time goes besides training (the deployment overhead benchmark reads these)
# age of the ClientApp process when the message arrived, for its first message only (a
# warm worker pays the start once; later messages report 0)
PROCESS_SECONDS = "process-seconds"
PROCESS_ID = "process-id"  # PID of the process that ran the message (same across a warm run)
PROCESS_PEAK_MIB = "process-peak-mib"  # peak resident memory of that process so far (MiB)
HANDLER_SECONDS = "handler-seconds"  # the whole train handler: setup, training, encoding
EPSILON = "epsilon"  # DP epsilon spent so far by the node (cumulative over rounds)
DELTA = "delta"
DECLINED = "declined"  # 1 when the node refuses the round (privacy budget spent)
REASON = "reason"  # ConfigRecord key with the node's reason for declining
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# MetricRecord keys of a node's self-description (reply to a QUERY message)
NODE_RANK = "rank"
NODE_PARTITION = "partition-id"

# MetricRecord keys a node reports about its merged base (fedlora.lora.base_merge)
from fedlora.lora.base_merge import BASE_FINGERPRINT as BASE_FINGERPRINT  # noqa: E402
from fedlora.lora.base_merge import LAST_MERGED as LAST_MERGED  # noqa: E402

# Compressed links (fedlora.wire.links)
DOWNLINK_BASE = "downlink-base-round"  # the round of the payload the delta is taken from;
# -1: nothing held, every tensor dense. Absent when the downlink is not compressed.
UPLINK_RESIDUAL = "uplink-residual"  # node store name of the error-feedback residual
DOWNLINK_HELD = "downlink-held"  # node store name of the last reconstructed payload

# Secure aggregation (fedlora.secagg; clients/secure_node.py, server/secure_aggregation.py)
SECAGG_ACTION = "secagg"  # messages of type "query.secagg" carry the stages around training
SECAGG_STAGE = "secagg-stage"
SECAGG_PARAMS = "secagg-params"  # SecAggParams as JSON
SECAGG_NODES = "secagg-nodes"  # node ids of the lists that follow (keys, ciphertexts, shares)
SECAGG_PK1 = "secagg-pk1"
SECAGG_PK2 = "secagg-pk2"
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"
SECAGG_WEIGHT = "secagg-weight"  # the node's p_k, set by the server from its declared count
SECAGG_SURVIVORS = "secagg-survivors"
SECAGG_DROPPED = "secagg-dropped"
SECAGG_SHARES = "secagg-shares"
SECAGG_MASKED = "secagg-masked"  # ArrayRecord key of the masked vector (uint32)
