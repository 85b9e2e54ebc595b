from .prune import PruneCallback
from .downstream import DownstreamEvalCallback
from .edit_metrics import EditMetricsCallback
