"""The submission API: FastAPI over the shared ``core`` package. It never imports torch or diffusers."""
