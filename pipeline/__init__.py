"""Fine-tune Hugging Face text classifiers: the library under the DVC stages (``stages/``).

Every entry point (the stages, ``hf-text-pipeline``, the Hydra sweep plugins) imports this package
before MLflow, which decides at import whether to send usage telemetry: it is off here unless the
user turns it on with ``MLFLOW_DISABLE_TELEMETRY=false``.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
