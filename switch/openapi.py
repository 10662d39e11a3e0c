"""The OpenAPI 3.1 document of the switch's admin API (served at ``/openapi.json``).

It describes what `switch.admin.AdminServer` answers: the registrar's bindings, active
calls, devices and their emergency locations, sites, emergency readiness, audit export
and test calls, fair-use usage and blacklist exceptions, reload, metrics and health. Every
response code a route can give is listed, so a client (or schemathesis) can hold the
server to it. Built as a plain dict: no file to ship beside the package.
"""

from __future__ import annotations

import copy
from typing import Any

import phonenumbers

API_VERSION = "1.0.0"

# Path parameters: the shapes the switch's configuration allows (switch/settings.py).
SIP_USERNAME = r"^[A-Za-z0-9._~!$&'()*+,;=-]{1,64}$"
ACCOUNT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CALL_ID = r"^[A-Za-z0-9][A-Za-z0-9._~!*+'():@-]{0,199}$"
E164_PREFIX = r"^\+[1-9][0-9]{0,14}$"
COUNTRY = r"^[A-Z]{2}$"
MONTH = r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])$"  # a UTC month, 1970-01 to 2999-12


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _object(properties: dict[str, Any], *, required: list[str] | None = None,
            closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _page_of(item: str) -> dict[str, Any]:
    return _object({
        "total": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1},
        "offset": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "items": _ref(item)},
    })


def _path_parameter(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "pattern": pattern}}


USERNAME = _path_parameter("username", SIP_USERNAME, "the device's SIP username")
ACCOUNT = _path_parameter("account_id", ACCOUNT_ID, "the account id")
PERSON = _path_parameter("person", SIP_USERNAME,
                         "a device's SIP username or an E.164 number (+ and digits)")
PAGE = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "offset", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0}},
]

ADDRESS = {"type": "object", "additionalProperties": {"type": "string"},
           "description": "RFC 5139 civic address elements (element name: value)"}

RESOLVED_LOCATION: dict[str, Any] = {
    "status": {"enum": ["verified", "default", "unconfirmed"]},
    "site": _nullable("string"),
    "location": _nullable("string"),
    "verified": {"type": "boolean"},
    "method": {"type": "string", "description": "the PIDF-LO method"},
    "summary": {"type": "string"},
    "address": ADDRESS,
    "note": {"type": "string"},
    "foreign_country": _nullable("string"),
}

SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string"}}),
    "Live": _object({"status": {"const": "ok"},
                     "uptime_seconds": {"type": "number", "minimum": 0}}),
    "Ready": _object({
        "ready": {"type": "boolean"},
        "sip_listening": {"type": "boolean"},
        "emergency_problems": {"type": "integer", "minimum": 0},
        "fair_use_store_degraded": {"type": "boolean"},
    }),
    "Binding": _object({
        "aor": {"type": "string"},
        "contact": {"type": "string"},
        "expires": {"type": "integer", "minimum": 0,
                    "description": "seconds until the binding expires"},
        "expires_at": {"type": "string", "format": "date-time"},
        "source": {"type": "string", "description": "transport:host:port of the REGISTER"},
        "user_agent": _nullable("string"),
        "account": _nullable("string"),
        "device": _nullable("string", description="the device's extension"),
        "instance_id": _nullable("string"),
        "registered_at": _nullable("string", format="date-time"),
    }),
    "Registration": _object({
        "username": {"type": "string"},
        "aor": {"type": "string"},
        "bindings": {"type": "array", "items": _ref("Binding")},
    }),
    "Call": _object({
        "call_id": {"type": "string"},
        "state": {"enum": ["routing", "early", "answered", "confirmed", "ended"]},
        "account": {"type": "string"},
        "caller": {"type": "string"},
        "callee": {"type": "string"},
        "dialled": {"type": "string"},
        "classification": {"type": "string"},
        "trunk": _nullable("string"),
        "started": {"type": "string", "format": "date-time"},
        "answered": _nullable("string", format="date-time"),
        "emergency": {"type": "boolean"},
    }),
    "ResolvedLocation": _object(RESOLVED_LOCATION),
    "Device": _object({
        "username": {"type": "string"},
        "extension": {"type": "string"},
        "account": {"type": "string"},
        "kind": {"enum": ["desk_phone", "ata", "softphone"]},
        "site": _nullable("string", description="the configured site"),
        "location": _nullable("string", description="the configured location"),
        "mobility": {"enum": ["fixed", "nomadic"]},
        "has_location": {"type": "boolean",
                         "description": "a dispatchable location is known now"},
        "location_status": _ref("ResolvedLocation"),
    }),
    "DeviceLocation": _object({
        "username": {"type": "string"},
        "mobility": {"enum": ["fixed", "nomadic"]},
        "has_location": {"type": "boolean"},
        **RESOLVED_LOCATION,
    }),
    "LocationUpdate": _object({
        "site": {"type": "string", "minLength": 1, "maxLength": 200},
        "location": _nullable("string", minLength=1, maxLength=200),
    }, required=["site"]),
    "LocationHistory": _object({
        "username": {"type": "string"},
        "entries": {"type": "array", "items": _object({
            "when": {"type": "string"},
            "username": {"type": "string"},
            "who": {"type": "string", "description": "registrar, the user, admin:<token>"},
            "reason": {"type": "string"},
            "old": {"type": "string"},
            "new": {"type": "string"},
            "status": {"type": "string"},
        }, closed=False)},
    }),
    "Site": _object({
        "id": {"type": "string"},
        "country": {"type": "string", "pattern": COUNTRY},
        "address": ADDRESS,
        "summary": {"type": "string"},
        "callback_number": _nullable("string"),
        "routes": {"type": "array", "items": {"type": "string"}},
        "locations": {"type": "array", "items": _object({"id": {"type": "string"},
                                                        "summary": {"type": "string"}})},
        "networks": {"type": "array", "items": _object({
            "subnet": {"type": "string"},
            "location": _nullable("string"),
            "country": _nullable("string"),
        })},
        "notification_recipients": {"type": "integer", "minimum": 0},
    }),
    "Sites": _object({"default_site": _nullable("string"),
                      "sites": {"type": "array", "items": _ref("Site")}}),
    "Readiness": _object({
        "ready": {"type": "boolean"},
        "problems": {"type": "array", "items": {"type": "string"}},
        "devices_without_location": {"type": "array", "items": {"type": "string"}},
    }),
    "AuditEntry": _object({
        "v": {"type": "integer"},
        "seq": {"type": "integer", "minimum": 1},
        "time": {"type": "string"},
        "call_id": {"type": "string"},
        "event": {"type": "string"},
        "fields": {"type": "object"},
        "prev": {"type": "string"},
        "hash": {"type": "string"},
    }, required=["seq", "time", "call_id", "event"], closed=False),
    "Audit": _object({
        "entries": {"type": "array", "items": _ref("AuditEntry")},
        "count": {"type": "integer", "minimum": 0},
        "truncated": {"type": "boolean"},
    }),
    "TestCallRequest": _object({
        "device": {"type": "string", "pattern": SIP_USERNAME},
        "service_urn": {"type": "boolean", "default": False,
                        "description": "urn:service:test.sos even where 933 exists"},
    }, required=["device"]),
    "TestCallResult": {
        "type": "object",
        "properties": {
            "call_id": {"type": "string"},
            "device": {"type": "string"},
            "dialled": {"type": "string"},
            "attempts": {"type": "array", "items": _object({
                "trunk": {"type": "string"},
                "result": {"type": ["integer", "string", "null"]},
            })},
            "status": _nullable("integer"),
            "trunk": _nullable("string"),
            "text": {"type": "string"},
        },
        "required": ["call_id", "device", "dialled", "attempts", "status"],
    },
    "Usage": _object({
        "account": {"type": "string"},
        "month": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$"},
        "enabled": {"type": "boolean"},
        "plan": {"type": "string"},
        "store_degraded": {"type": "boolean"},
        "leases": _object({
            "account": _object({"active": {"type": "integer", "minimum": 0},
                                "max_calls": _nullable("integer")}),
            "this_node": {"type": "integer", "minimum": 0},
        }),
        "minutes": _object({
            "lines": {"type": "array", "items": _object({
                "device": {"type": "string"},
                "extension": {"type": "string"},
                "active_calls": {"type": "integer", "minimum": 0},
                "max_calls": _nullable("integer"),
                "seconds": {"type": "integer", "minimum": 0},
                "quota_seconds": _nullable("integer"),
            })},
            "pooled": _object({"seconds": {"type": "integer", "minimum": 0},
                               "quota_seconds": _nullable("integer"),
                               "users": {"type": "integer", "minimum": 1}}),
            "account": _object({"seconds": {"type": "integer", "minimum": 0},
                                "quota_seconds": _nullable("integer")}),
        }),
        "patterns": {"type": "object", "description": "call-pattern signals of the account"},
    }),
    "BlacklistExceptions": _object({
        "countries": {"type": "array", "uniqueItems": True, "maxItems": 300,
                      "items": {"enum": sorted(phonenumbers.SUPPORTED_REGIONS)}},
        "prefixes": {"type": "array", "uniqueItems": True, "maxItems": 1000,
                     "items": {"type": "string", "pattern": E164_PREFIX}},
    }, required=[]),
    "BlacklistExceptionsDocument": _object({
        "account": {"type": "string"},
        "configured": _ref("BlacklistExceptions"),
        "runtime": _ref("BlacklistExceptions"),
        "effective": _ref("BlacklistExceptions"),
    }),
    "Availability": _object({
        "uptime_seconds": {"type": ["number", "null"], "minimum": 0,
                           "description": "since the switch became available (0 while"
                                          " draining for a shutdown)"},
        "running_since": _nullable("string", format="date-time"),
        "monitored_since": _nullable("string", format="date-time",
                                     description="the first start with this state file"),
        "persistent": {"type": "boolean",
                       "description": "false: the state file is unusable or held by another"
                                      " process, figures are this process's only"},
        "month": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$"},
        "minutes_in_month": {"type": "number", "minimum": 0},
        "monitored_minutes": {"type": "number", "minimum": 0},
        "unavailable_minutes": {"type": "number", "minimum": 0},
        "availability": {"type": "number", "minimum": 0, "maximum": 1,
                         "description": "(minutes of the month - minutes unavailable)"
                                        " / minutes of the month"},
        "availability_percent": {"type": "number", "minimum": 0, "maximum": 100},
        "availability_so_far": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                                "description": "over the monitored part of the month"},
        "outages": {"type": "array", "items": _object({
            "from": {"type": "string", "format": "date-time"},
            "to": {"type": "string", "format": "date-time"},
            "minutes": {"type": "number", "minimum": 0},
        })},
    }),
    "PersonalData": _object({
        "person": {"type": "string"},
        "kind": {"enum": ["device", "number", "username"]},
        "generated": {"type": "string", "format": "date-time"},
        "identifiers": _object({
            "usernames": {"type": "array", "items": {"type": "string"}},
            "numbers": {"type": "array", "items": {"type": "string"}},
            "lines": {"type": "array", "items": {"type": "string"},
                      "description": "account/extension"},
        }),
        "devices": {"type": "array", "items": {"type": "object"},
                    "description": "configured devices (credentials left out)"},
        "registrations": {"type": ["array", "null"], "items": {"type": "object"}},
        "location_history": {"type": "array", "items": {"type": "object"}},
        "cdrs": {"type": "array", "items": {"type": "object"},
                 "description": "call detail records as stored"},
        "emergency_calls": {"type": "array", "items": _ref("AuditEntry"),
                            "description": "audit journal entries of the person's"
                                           " emergency calls (kept, never erased)"},
        "notes": {"type": "array", "items": {"type": "string"}},
    }),
    "ErasureReport": _object({
        "person": {"type": "string"},
        "kind": {"enum": ["device", "number", "username"]},
        "dry_run": {"type": "boolean"},
        "devices": {"type": "array", "items": {"type": "object"}},
        "cdr": _object({
            "directory": {"type": "string"},
            "files": {"type": "array", "items": {"type": "string"}},
            "records": {"type": "integer", "minimum": 0},
            "fields": {"type": "integer", "minimum": 0},
            "unreadable_lines": {"type": "integer", "minimum": 0},
        }),
        "location_history": _object({"file": {"type": "string"},
                                     "entries": {"type": "integer", "minimum": 0}}),
        "emergency_journal": _object({
            "erased": {"const": False},
            "entries_kept": {"type": "integer", "minimum": 0},
            "reason": {"type": "string"},
        }),
        "notes": {"type": "array", "items": {"type": "string"}},
    }),
    "ReloadResult": _object({
        "applied": {"type": "boolean"},
        "errors": {"type": "array", "items": {"type": "string"},
                   "description": "file:line: key: problem lines of a refused file"},
        "notes": {"type": "array", "items": {"type": "string"},
                  "description": "what an applied reload could not change (needs a restart)"},
    }),
}

RESPONSES: dict[str, Any] = {
    "BadRequest": _json_body(_ref("Error"), "the request is not valid (the error says why)"),
    "Unauthorized": {
        **_json_body(_ref("Error"), "no bearer token, or one the switch does not know"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "Forbidden": {
        **_json_body(_ref("Error"), "the token may only read"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "TooLarge": _json_body(_ref("Error"), "the body is larger than 64 KiB"),
    "NotFound": _json_body(_ref("Error"), "no such device, account or call"),
    "Conflict": _json_body(_ref("Error"), "the switch cannot do it in its configuration"),
}


def _read(summary: str, schema: dict[str, Any], *, parameters: list[Any] | None = None,
          not_found: bool = False, bad_request: bool = False,
          operation_id: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _json_body(schema, summary),
                                 "401": _response("Unauthorized")}
    if bad_request:
        responses["400"] = _response("BadRequest")
    if not_found:
        responses["404"] = _response("NotFound")
    return {"get": {"summary": summary, "operationId": operation_id,
                    "parameters": list(parameters or []), "responses": responses}}


def _write(method: str, summary: str, responses: dict[str, Any], *, operation_id: str,
           body: dict[str, Any] | None = None, parameters: list[Any] | None = None
           ) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary, "operationId": operation_id, "parameters": list(parameters or []),
        "responses": {**responses, "401": _response("Unauthorized"),
                      "403": _response("Forbidden")},
    }
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body}}}
        operation["responses"].setdefault("400", _response("BadRequest"))
        operation["responses"]["413"] = _response("TooLarge")
    return {method: operation}


def _paths(metrics_public: bool) -> dict[str, Any]:
    v1 = "/api/v1"
    metrics_responses: dict[str, Any] = {"200": {
        "description": "Prometheus text exposition of the switch's metrics",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }}
    metrics: dict[str, Any] = {"summary": "Prometheus metrics", "operationId": "getMetrics",
                               "responses": metrics_responses}
    if metrics_public:
        metrics["security"] = []
    else:
        metrics_responses["401"] = _response("Unauthorized")
    public = {"security": []}
    exceptions_path = f"{v1}/fair-use/accounts/{{account_id}}/blacklist-exceptions"
    return {
        "/openapi.json": {"get": {
            "summary": "this document", "operationId": "getOpenApi", **public,
            "responses": {"200": _json_body({"type": "object"}, "the OpenAPI document")}}},
        "/healthz/live": {"get": {
            "summary": "liveness: the process answers", "operationId": "getLive", **public,
            "responses": {"200": _json_body(_ref("Live"), "alive")}}},
        "/healthz/ready": {"get": {
            "summary": "readiness: SIP listening, emergency calling ready, fair-use store"
                       " reachable", "operationId": "getReady", **public,
            "responses": {"200": _json_body(_ref("Ready"), "ready"),
                          "503": _json_body(_ref("Ready"), "not ready")}}},
        "/metrics": {"get": metrics},
        f"{v1}/registrations": _read(
            "registered contacts (bindings), by address-of-record", _page_of("Binding"),
            parameters=PAGE, bad_request=True, operation_id="listRegistrations"),
        f"{v1}/registrations/{{username}}": _read(
            "one device's registered contacts", _ref("Registration"), parameters=[USERNAME],
            not_found=True, operation_id="getRegistration"),
        f"{v1}/calls": _read(
            "calls in progress", _page_of("Call"), parameters=PAGE, bad_request=True,
            operation_id="listCalls"),
        f"{v1}/calls/{{call_id}}": _write(
            "delete", "hang up a call (BYE or CANCEL to both legs)",
            {"204": {"description": "the call is being ended"},
             "404": _response("NotFound")},
            parameters=[_path_parameter("call_id", CALL_ID, "leg A's SIP Call-ID")],
            operation_id="hangUpCall"),
        f"{v1}/devices": _read(
            "configured devices and their emergency location", _page_of("Device"),
            parameters=PAGE, bad_request=True, operation_id="listDevices"),
        f"{v1}/devices/{{username}}/location": {
            **_read("the device's emergency location now", _ref("DeviceLocation"),
                    parameters=[USERNAME], not_found=True, operation_id="getDeviceLocation"),
            **_write("put", "set (confirm) the device's emergency location; journaled as"
                            " admin:<token name>",
                     {"200": _json_body(_ref("DeviceLocation"), "the location now"),
                      "404": _response("NotFound"), "409": _response("Conflict")},
                     body=_ref("LocationUpdate"), parameters=[USERNAME],
                     operation_id="setDeviceLocation"),
        },
        f"{v1}/devices/{{username}}/location/history": _read(
            "the device's journaled location changes, oldest first", _ref("LocationHistory"),
            parameters=[USERNAME], not_found=True, operation_id="getDeviceLocationHistory"),
        f"{v1}/sites": _read("emergency sites", _ref("Sites"), operation_id="listSites"),
        f"{v1}/emergency/readiness": _read(
            "what keeps emergency calling from being ready (EM-81)", _ref("Readiness"),
            operation_id="getEmergencyReadiness"),
        f"{v1}/emergency/audit": {"get": {
            "summary": "export of the emergency audit journal (EM-70)",
            "operationId": "getEmergencyAudit",
            "parameters": [
                {"name": "from", "in": "query", "required": False,
                 "description": "first instant (ISO-8601 date or date-time, UTC by default)",
                 "schema": {"type": "string", "format": "date-time"}},
                {"name": "until", "in": "query", "required": False,
                 "description": "end instant, excluded",
                 "schema": {"type": "string", "format": "date-time"}},
                {"name": "call_id", "in": "query", "required": False,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 256}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 100_000,
                            "default": 10_000}},
                {"name": "format", "in": "query", "required": False,
                 "schema": {"enum": ["json", "jsonl"], "default": "json"}},
            ],
            "responses": {
                "200": {"description": "the entries, in journal order",
                        "content": {"application/json": {"schema": _ref("Audit")},
                                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                "400": _response("BadRequest"),
                "401": _response("Unauthorized"),
            }}},
        f"{v1}/emergency/test-calls": _write(
            "post", "place an emergency test call for a device (933 or"
                    " urn:service:test.sos, EM-80) and return its result",
            {"202": _json_body(_ref("TestCallResult"), "the test call's result"),
             "404": _response("NotFound"), "409": _response("Conflict")},
            body=_ref("TestCallRequest"), operation_id="placeTestCall"),
        f"{v1}/fair-use/accounts/{{account_id}}/usage": _read(
            "an account's live fair-use counters: leases, minutes this month, patterns",
            _ref("Usage"), parameters=[ACCOUNT], not_found=True, operation_id="getUsage"),
        exceptions_path: {
            **_read("the account's blacklist exceptions: configured, added here, in force",
                    _ref("BlacklistExceptionsDocument"), parameters=[ACCOUNT],
                    not_found=True, operation_id="getBlacklistExceptions"),
            **_write("put", "replace the exceptions added at runtime (kept in memory)",
                     {"200": _json_body(_ref("BlacklistExceptionsDocument"),
                                        "the exceptions now"),
                      "404": _response("NotFound")},
                     body=_ref("BlacklistExceptions"), parameters=[ACCOUNT],
                     operation_id="setBlacklistExceptions"),
            **_write("delete", "drop the exceptions added at runtime",
                     {"204": {"description": "only the configured exceptions remain"},
                      "404": _response("NotFound")},
                     parameters=[ACCOUNT], operation_id="clearBlacklistExceptions"),
        },
        f"{v1}/availability": _read(
            "uptime and a month's availability (this UTC month unless month is given),"
            " with its outages", _ref("Availability"),
            parameters=[{"name": "month", "in": "query", "required": False,
                         "description": "YYYY-MM (UTC)",
                         "schema": {"type": "string", "pattern": MONTH}}],
            bad_request=True, operation_id="getAvailability"),
        f"{v1}/privacy/{{person}}": _read(
            "everything the switch holds about a person (device username or E.164"
            " number): devices, registrations, location history, CDRs, emergency calls",
            _ref("PersonalData"), parameters=[PERSON], bad_request=True,
            operation_id="exportPersonalData"),
        f"{v1}/privacy/{{person}}/erase": _write(
            "post", "pseudonymise a person in the CDRs and the location history (the"
                    " emergency audit journal is kept as the legal record)",
            {"200": _json_body(_ref("ErasureReport"), "what was changed"),
             "400": _response("BadRequest"), "409": _response("Conflict")},
            parameters=[PERSON], operation_id="erasePersonalData"),
        f"{v1}/reload": _write(
            "post", "re-read and apply the YAML configuration (rejected whole when invalid)",
            {"200": _json_body(_ref("ReloadResult"), "applied"),
             "400": _json_body(_ref("ReloadResult"), "rejected: the running configuration"
                                                     " stays"),
             "500": _json_body(_ref("ReloadResult"), "the reload failed unexpectedly"),
             "501": _json_body(_ref("ReloadResult"), "reload is not available")},
            operation_id="reloadConfiguration"),
    }


def openapi_document(*, metrics_public: bool = False) -> dict[str, Any]:
    """A fresh copy of the document (callers may add paths to it)."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "softswitch admin API",
            "version": API_VERSION,
            "description": "Registrations, calls, devices and emergency locations, sites,"
                           " emergency readiness and audit, fair use, reload, availability, personal"
                           " data. Bearer tokens"
                           " from the admin.tokens list of the YAML: role read for GET, role"
                           " write for changes.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(metrics_public),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
            "responses": RESPONSES,
        },
    })
