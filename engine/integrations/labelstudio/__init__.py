"""The Label Studio edge: the managed server (its own virtualenv, `server.py`) and every SDK call, in project
types (`client.py`); what both raise in `errors.py`.

Nothing else in the project imports `label_studio_sdk` (except the brush RLE parity tests).

Server lifecycle
    Label Studio's pins clash with ours (pyarrow<25, Django, ...), so it lives in its own virtualenv:
    `$SA_ENGINE_LS_VENV`, default `$SA_ENGINE_HOME/label-studio-<version>-venv` with `SA_ENGINE_HOME`
    defaulting to `~/.cache/sa-engine`. `ensure_installed()` creates it with `python -m venv` + pip on
    first use (about 1 GB, minutes); a marker file written last makes it idempotent, a lock file makes
    concurrent first uses safe. `start_server()` runs it headless on 127.0.0.1 (never 0.0.0.0) with
    SQLite, an admin user and a legacy API token under a data directory, records the PID and waits for
    `/health`; `stop_server()` stops it by that PID. To use an existing server instead, give
    `labelstudio.managed: false`, `url` and `token` (env SA_ENGINE_LS_TOKEN) and skip the lifecycle.

Projects, tasks, predictions, annotations
    `LabelStudio` wraps the SDK client. Masks cross this edge as `(H, W) bool` arrays and leave it
    as brush RLE results (storage/brush_rle.py); prompts as pixel coordinates. Every call retries
    with backoff when the server is unreachable, then raises `LabelStudioUnavailable` (one line).
"""
from engine.integrations.labelstudio.client import (BOX_TAG, CLICK_TAG, CONCEPT_TAG, IMAGE_TAG, MASK_TAG,  # noqa: F401
                                                    OBJECT_LABEL, PREFILL_LABEL, UNSURE_TAG, LabelStudio,
                                                    PrefillMask, PulledAnnotation, PulledRegion, PullResult,
                                                    TaskImage, brush_result, concept_prompt_tag, decode_export,
                                                    keypoint_context, labeling_config, unsure_result)
from engine.integrations.labelstudio.errors import LabelStudioError, LabelStudioUnavailable  # noqa: F401
from engine.integrations.labelstudio.server import (LS_VERSION, ServerInfo, ServerSettings,  # noqa: F401
                                                    _credentials, _wait_healthy, engine_home, ensure_installed,
                                                    free_port, health_ok, is_installed, port_is_free, private_dir,
                                                    server_status, start_server, stop_server, venv_dir,
                                                    write_private_file)
