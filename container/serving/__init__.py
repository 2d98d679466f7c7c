"""The inference server: FastAPI + uvicorn under SageMaker's hosting and batch contract."""
