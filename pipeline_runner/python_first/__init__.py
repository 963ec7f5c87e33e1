"""Python-first pipelines: operators declare their defaults and the operators they call in code.

``runner compile`` turns the classes into a deployment file; the file is what runs (see the
README's "Python-first pipelines").
"""

from .declare import Depends, depends, operator_defaults, operator_name
from .endpoint import OperatorHandle, endpoint

__all__ = ["Depends", "OperatorHandle", "depends", "endpoint", "operator_defaults", "operator_name"]
