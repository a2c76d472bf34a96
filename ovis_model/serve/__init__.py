"""`ovis-chat MODEL_DIR --serve`: a chat page and an OpenAI-compatible API for a trained model, on one port.

Modules: `worker` (one generation at a time, a bounded queue), `messages` (OpenAI requests as Ovis
conversations), `api` (the /v1 routes), `page` (the Gradio page), `app` (both on one FastAPI app).
FastAPI and uvicorn come with Gradio: `pip install 'ovis-toolkit[serve]'`.
"""
