"""HTTP layer: request/response models, routes, error mapping and ASGI middleware."""
from fastapi import APIRouter

from service.api import admin, classify, health, tasks, token

router = APIRouter()
router.include_router(classify.router, tags=["classify"])
router.include_router(tasks.router, tags=["tasks"])
router.include_router(admin.router, tags=["task versions"])
router.include_router(token.router, tags=["auth"])
router.include_router(health.router, tags=["health"])

__all__ = ["router"]
