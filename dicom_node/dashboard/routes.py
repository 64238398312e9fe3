"""The dashboard's router (every page, none of them in ``/openapi.json``) and the folder of
its static files, both mounted by ``dicom_node.api.app``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from dicom_node.dashboard import admin_pages, pages, session, study_pages

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)
router.include_router(session.router)
router.include_router(pages.router)
router.include_router(study_pages.router)
router.include_router(admin_pages.router)
