"""Session state and cached resources of the workbench: the one place pages get things from
(``from ui import state``). Each job lives in its own module; this one names them together.

* :mod:`ui.models`: the settings (of the model picked in the sidebar: :func:`settings`; of another:
  ``*_for(name)``), the model's client (:func:`client`: served or in-process, decided once by
  :func:`deepminer.client.connect`), the models there are (:func:`served_models`) and the picker;
* :mod:`ui.resources`: the label store, the unit atlas, the key labels are stored under, the sample
  images (one per process, ``st.cache_resource``);
* :mod:`ui.session`: per session, one :class:`Session` object in ``st.session_state`` (the current
  image and recent uploads, the chosen patch, the sketch...) and the widgets' keys (:class:`Keys`);
* :mod:`ui.images`: decoded images (one per content, process-wide, decoded in a worker thread;
  :func:`decoded`) and :func:`set_image`;
* :mod:`ui.calls`: explanations (:func:`explain`, cached per image, every failure a
  :class:`Failure` in words instead of a traceback) and the warm-up;
* :mod:`ui.identity`: who labels (:func:`annotator`) and the patient identifiers shown on demand.
"""
from __future__ import annotations

from ui.calls import (CANCELLED, Failure, explain, explain_methods, explain_methods_job, failure_of, forget_job,
                      show_ablation, show_failure, timed_explain, warm_up)
from ui.identity import PATIENT_TAGS, annotator, annotator_box, patient_identifiers, require_annotator, signed_in_user
from ui.images import PREVIEW_SIDE, Decoded, decoded, pixels, prefetch, set_image
from ui.models import (_settings, base_settings, client, client_of, model_dir_for, model_picker, picked_model,
                       served_models, settings, settings_for)
from ui.resources import atlas, atlas_data_root, atlas_problem, current_key, samples, store
from ui.session import (SESSION_KEY, WHOLE, Box, ImageRef, Keys, Session, flash, image, patch, recent, session,
                        set_patch, show_flash)

__all__ = [
    "CANCELLED", "Failure", "explain", "explain_methods", "explain_methods_job", "failure_of", "forget_job",
    "show_ablation", "show_failure", "timed_explain", "warm_up",
    "PATIENT_TAGS", "annotator", "annotator_box", "patient_identifiers", "require_annotator", "signed_in_user",
    "PREVIEW_SIDE", "Decoded", "decoded", "pixels", "prefetch", "set_image",
    "_settings",  # the cached settings (``_settings.clear()`` re-reads the environment)
    "base_settings", "client", "client_of", "model_dir_for", "model_picker", "picked_model", "served_models",
    "settings", "settings_for",
    "atlas", "atlas_data_root", "atlas_problem", "current_key", "samples", "store",
    "SESSION_KEY", "WHOLE", "Box", "ImageRef", "Keys", "Session", "flash", "image", "patch", "recent", "session",
    "set_patch", "show_flash",
]
