"""Our Label Studio ML backend: what it answers (predict.py: prompts, the embedding cache, the predictors, the
model follower) and how it is served (server.py: a WSGI app on waitress)."""
from engine.integrations.ml_backend.predict import (  # noqa: F401
    BASIC_USER,
    FETCH_DEADLINE_S,
    MAX_IMAGE_BYTES,
    BackendState,
    ConceptPredictor,
    EmbeddingCache,
    MaskPredictor,
    ModelFollower,
    Prompt,
    RequestError,
    authorized,
    load_embedding,
    precompute_embeddings,
    predict_payload,
    prefetch_payload,
    prompt_from_context,
    save_embedding,
    source_image_loader,
    text_from_context,
)
from engine.integrations.ml_backend.server import MAX_BODY_BYTES, MLBackend, ServerLimits, is_loopback, make_app  # noqa: F401
