from .prune import PruneCallback
from .rect import RectCallback
from .restraint import RestraintCallback
from .downstream import DownstreamEvalCallback
from .edit_metrics import EditMetricsCallback
from .progress import EditProgressBar
from .tensorboard import HParamsCallback, SpectrumHistogramCallback, TextSamplesCallback
