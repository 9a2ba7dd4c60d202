"""Data sources: built-in image sets (downloaded into the data folder when missing, see
`download`), synthetic data, .npz files and user loader functions."""

from netdoctor.data.sources import (
    ACCEPTED_FORMS,
    BUILTIN_SETS,
    DataSource,
    DataSpec,
    default_data_dir,
    open_source,
)

__all__ = [
    "ACCEPTED_FORMS",
    "BUILTIN_SETS",
    "DataSource",
    "DataSpec",
    "default_data_dir",
    "open_source",
]
