"""Save and load compiled models (``ispc.save``/``ispc.load``); the format is described in
:mod:`ispc.serialization.archive`.

- :mod:`~ispc.serialization.archive`: the ``.ispc`` zip (manifest + weights), :func:`save`, :func:`load`;
- :mod:`~ispc.serialization.program`: an exported program as JSON and back (the codec);
- :mod:`~ispc.serialization.modularize`: the rebuilt ATen graph made into modules again.
"""
from ..errors import ArchiveError
from .archive import FORMAT, FORMAT_VERSION, load, save
from .modularize import modularize
from .program import program_from_json, program_to_json

__all__ = ["save", "load", "ArchiveError", "FORMAT", "FORMAT_VERSION", "program_to_json",
           "program_from_json", "modularize"]
