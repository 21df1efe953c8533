"""Datasets: the built-in offline corpora (BBC News, tweets), user files, splits and partitions.

Every user error is a `DataError` whose message is one line naming the file, column or value
and the fix. `datasets` and `flwr_datasets` are imported lazily so `import fedprompt.data` is fast.
common.py (the error, the task, helpers), builtin.py (the corpora), files.py (user files),
load.py (the split), partition.py (clients' shares).
"""

from fedprompt.data.common import DataError, TaskData, package_dir
from fedprompt.data.files import MAX_JSON_DEPTH
from fedprompt.data.load import load_task_data
from fedprompt.data.partition import partition, with_rows

__all__ = ["MAX_JSON_DEPTH", "DataError", "TaskData", "load_task_data", "package_dir", "partition", "with_rows"]
