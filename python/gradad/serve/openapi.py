"""The OpenAPI 3.1 description of ``gradad serve``'s HTTP API, served at /openapi.json. Written
out here rather than generated, so that it says what the handlers in :mod:`gradad.serve.app`
promise, errors included; tests/test_serve.py checks that both name the same routes."""
from __future__ import annotations

from .. import __version__
from .config import LABEL_PATTERN
from .store import ID_PATTERN

__all__ = ["openapi_schema"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_INSPECTION = {"$ref": "#/components/schemas/Inspection"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    meaning = {401: "missing or wrong bearer token", 404: "no such inspection or file",
               409: "no folder source", 413: "body over --max-bytes or image over --max-pixels",
               415: "not image/* or multipart/form-data", 422: "not a readable image, or a bad parameter",
               500: "the model or the log failed for this image",
               503: "queue full or model not loaded (see Retry-After)"}
    return {str(c): _json(_ERROR, meaning[c]) for c in codes}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_LABELS = [_query("item_id", {"type": "string", "pattern": LABEL_PATTERN}, "the part's id"),
           _query("station", {"type": "string", "pattern": LABEL_PATTERN}, "the camera or station")]
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN.pattern}}
_PNG = {"description": "a PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def openapi_schema() -> dict:
    """The OpenAPI document (a dict ready for JSON)."""
    inspection = {
        "type": "object",
        "required": ["id", "score", "anomalous", "threshold", "heatmap_url", "model", "received_at", "timings_ms"],
        "properties": {
            "id": {"type": "string"}, "score": {"type": "number"},
            "anomalous": {"type": "boolean", "description": "score > threshold"},
            "threshold": {"type": "number", "description": "the threshold this image was judged by"},
            "heatmap_url": {"type": "string"}, "overlay_url": {"type": "string"},
            "image_url": {"type": ["string", "null"], "description": "with --keep-images"},
            "model": {"type": "object", "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}}},
            "received_at": {"type": "string", "format": "date-time"},
            "item_id": {"type": ["string", "null"]}, "station": {"type": ["string", "null"]},
            "source": {"enum": ["http", "watch"]}, "source_path": {"type": ["string", "null"]},
            "image_size": {"type": "array", "items": {"type": "integer"}, "description": "[height, width]"},
            "timings_ms": {"type": "object", "additionalProperties": {"type": "number"},
                           "description": "decode, queue, score (the batch's run), batch (its size), draw, "
                                          "commit, total"}}}
    image_body = {"content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "item_id": {"type": "string"},
            "station": {"type": "string"}}}}}, "required": True}
    paths = {
        "/": {"get": {"summary": "The inspection page", "security": [],
                      "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
        "/healthz": {"get": {"summary": "The process answers", "security": [],
                             "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/readyz": {"get": {"summary": "The model is loaded", "responses": {
            "200": _json({"type": "object"}, "ready"), **_errors(401, 503)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text exposition format 0.0.4", "content": {"text/plain": {}}}, **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors(401)}}},
        "/v1/inspect": {"post": {
            "summary": "Inspect one image; answered after the inspection is committed to the log",
            "parameters": _LABELS, "requestBody": image_body,
            "responses": {"200": _json(_INSPECTION, "the committed inspection"),
                          **_errors(401, 413, 415, 422, 500, 503)}}},
        "/v1/inspections": {"get": {
            "summary": "Inspections, newest first, a page at a time",
            "parameters": [_query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                                  "page size"),
                           _query("before", {"type": "integer"}, "the `next` of the previous page"),
                           _query("anomalous", {"enum": ["true", "false"]}, "only this decision"),
                           _query("station", {"type": "string"}, "only this station"),
                           _query("since", {"type": "string"}, "received at or after (ISO 8601 or unix s)"),
                           _query("until", {"type": "string"}, "received before (ISO 8601 or unix s)")],
            "responses": {"200": _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _INSPECTION}, "next": {"type": ["string", "null"]}}},
                "a page"), **_errors(401, 422)}}},
        "/v1/inspections/{id}": {"get": {"summary": "One inspection", "parameters": [_ID], "responses": {
            "200": _json(_INSPECTION, "the inspection"), **_errors(401, 404)}}},
        "/v1/inspections/{id}/{file}": {"get": {
            "summary": "An inspection's heatmap.png, overlay.png or (with --keep-images) image",
            "parameters": [_ID, {"name": "file", "in": "path", "required": True,
                                 "schema": {"enum": ["heatmap.png", "overlay.png", "image"]}}],
            "responses": {"200": _PNG, **_errors(401, 404)}}},
        "/v1/threshold": {
            "get": {"summary": "The threshold in use and its changes",
                    "responses": {"200": _json({"type": "object"}, "threshold"), **_errors(401)}},
            "put": {"summary": "Change the decision threshold (recorded in the log)",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["threshold"],
                        "properties": {"threshold": {"type": "number"}}}}}},
                    "responses": {"200": _json({"type": "object"}, "the new threshold"), **_errors(401, 422, 503)}}},
        "/v1/status": {"get": {"summary": "Model, threshold, counts, queue and folder source", "responses": {
            "200": _json({"type": "object"}, "status"), **_errors(401)}}},
        "/v1/pause": {"post": {"summary": "Pause the folder source (--watch)", "responses": {
            "200": _json({"type": "object"}, "paused"), **_errors(401, 409)}}},
        "/v1/resume": {"post": {"summary": "Resume the folder source", "responses": {
            "200": _json({"type": "object"}, "resumed"), **_errors(401, 409)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "gradad serve", "version": __version__,
                 "description": "Line-side anomaly inspection with an exported GRAD detector."},
        "paths": paths,
        "components": {
            "schemas": {"Inspection": inspection, "Error": {
                "type": "object", "required": ["error", "status"],
                "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the service runs with --token"}}},
        "security": [{"bearer": []}, {}],
    }
