"""lm-evaluation-harness 0.4.x's own HellaSwag and WinoGrande functions, for local_hellaswag.yaml and
local_winogrande.yaml (imported from the installed lm_eval, not copied)."""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)
