"""OpenAPI 3.1 description of the local API; ``docs/openapi.json`` holds the same (a test checks)."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["OPENAPI"]

_ERROR: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error", "status"],
    "properties": {
        "error": {"type": "string", "description": "one line saying why"},
        "status": {"type": "integer"},
    },
}


def _err(text: str) -> dict[str, Any]:
    return {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_AUTH_ERRORS: Final[dict[str, Any]] = {
    "401": _err("no bearer token, or an unknown one"),
    "403": _err("the token lacks the scope this route needs"),
    "429": _err("this client failed authentication too often (locked out), or the token's query budget or "
                "rate limit is used up: retry after Retry-After seconds"),
}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "EdgeGuard local inference API",
        "version": "1",
        "description": "Served on a Unix socket and/or a loopback port by `edgeguard run`. "
        "Every result is also "
        "stored in the outbox and published on MQTT.",
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "scopes: infer, status, admin, explain (see docs/sources.md)",
            }
        },
        "schemas": {
            "Error": _ERROR,
            "Tensor": {
                "oneOf": [
                    {"type": "array", "description": "nested arrays in the model's declared shape"},
                    {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "data": {"type": "array", "description": "flat values"},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "dtype": {"type": "string", "description": "must equal the declared dtype"},
                        },
                        "additionalProperties": False,
                    },
                ]
            },
            "InferJson": {
                "type": "object",
                "properties": {
                    "inputs": {
                        "type": "object",
                        "additionalProperties": {"$ref": "#/components/schemas/Tensor"},
                    },
                    "image_b64": {"type": "string", "contentEncoding": "base64"},
                    "id": {"type": "string", "maxLength": 128, "description": "echoed as correlation_id"},
                },
                "additionalProperties": False,
                "description": "exactly one of inputs or image_b64",
            },
            "Result": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": "string", "description": "unique result id (device id + sequence)"},
                    "correlation_id": {"type": ["string", "null"]},
                    "model": {"type": "object"},
                    "latency_ms": {"type": "number"},
                    "backend": {"type": "string"},
                    "accelerator": {"type": "string"},
                    "post": {},
                    "outputs": {"type": "object"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/infer": {
            "post": {
                "summary": "Run one inference (scope: infer); the result is durable in the outbox on return",
                "parameters": [
                    {
                        "name": "input",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "input name for an .npy body when the model has several inputs",
                    },
                    {
                        "name": "id",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": 128},
                        "description": "correlation id for .npy and image bodies",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InferJson"}},
                        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                        "image/*": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "the result",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Result"}}},
                    },
                    "400": _err("malformed body or an input the model's guard rejected"),
                    **_AUTH_ERRORS,
                    "413": _err("body larger than the configured limit"),
                    "415": _err("unsupported content type"),
                    "422": _err("the model's adversarial-input detector refused the input "
                                "(manifest defence.adversarial.mode = reject)"),
                    "500": _err("the inference backend failed"),
                    "503": _err("busy, stopping, reloading, or in the safe state"),
                },
            }
        },
        "/v1/explain": {
            "post": {
                "summary": "Which regions of a photo decide the model's top box or class (scope: "
                "explain): an occlusion heatmap, at most sources.api.explain_max_passes forward passes; "
                "not queued for MQTT",
                "requestBody": {
                    "required": True,
                    "content": {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "the target (kind, class index, label, box in the photo's "
                        "pixels) and a 16x16 grid of heat scaled to [0, 1]; no scores or raw outputs",
                        "content": {"application/json": {}},
                    },
                    "400": _err("not a PNG/JPEG photo the model's preprocessing accepts"),
                    **_AUTH_ERRORS,
                    "404": _err("explanations are off (explain_max_passes = 0)"),
                    "413": _err("body larger than the configured limit"),
                    "415": _err("not image/png or image/jpeg"),
                    "500": _err("the inference backend failed"),
                    "503": _err("busy, stopping, reloading, or no model serving"),
                },
            }
        },
        "/v1/health": {
            "get": {
                "summary": "Health of every stage (scope: status); 503 when a health check fails",
                "responses": {
                    "200": {"description": "healthy", "content": {"application/json": {}}},
                    **_AUTH_ERRORS,
                    "503": {"description": "a health check fails", "content": {"application/json": {}}},
                },
            }
        },
        "/v1/admin/{action}": {
            "post": {
                "summary": "Administrative action (scope: admin): 'reload' re-reads the config and bundle",
                "parameters": [
                    {"name": "action", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {"description": "done", "content": {"application/json": {}}},
                    "400": _err("bad arguments"),
                    **_AUTH_ERRORS,
                    "404": _err("unknown action"),
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            }
        },
    },
}
