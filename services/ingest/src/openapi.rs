//! The OpenAPI 3 document of the tracking API, built from the same route table as the
//! router ([`crate::http::ROUTES`]), so the two cannot disagree. Served at `/openapi.json`;
//! a test keeps `docs/openapi.json` equal to it.

use serde_json::{json, Map, Value};

use crate::http::{RouteKind, ROUTES};
use crate::native::NATIVE_TYPES;
use crate::segment::Call;

fn common_properties() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("userId".into(), json!({"type": "string", "description": "The user's id in your system. userId or anonymousId is required."}));
    m.insert("anonymousId".into(), json!({"type": "string", "description": "A device or session id before the user is known."}));
    m.insert("messageId".into(), json!({"type": "string", "maxLength": 100, "description": "Idempotency key: the same messageId gives the same event id."}));
    m.insert("timestamp".into(), json!({"type": "string", "format": "date-time", "description": "When it happened (corrected for client clock skew with sentAt)."}));
    m.insert(
        "sentAt".into(),
        json!({"type": "string", "format": "date-time"}),
    );
    m.insert("context".into(), json!({"type": "object", "description": "context.device.id links a device id; context.traits.email/phone link identifiers; context.consent.categoryPreferences become consent events; context.channel sets the interaction channel."}));
    m.insert(
        "integrations".into(),
        json!({"type": "object", "description": "Accepted and ignored."}),
    );
    m
}

fn segment_schema(call: Call) -> Value {
    let mut props = common_properties();
    let mut required: Vec<&str> = Vec::new();
    match call {
        Call::Identify => {
            props.insert("traits".into(), json!({"type": "object", "description": "firstName, lastName, email, phone, birthday, address{street,city,postalCode,state,country}, country; the rest are kept as custom traits. All PII is sealed."}));
        }
        Call::Track => {
            props.insert("event".into(), json!({"type": "string", "description": "The action. Order Completed / Order Refunded / Order Cancelled follow the Segment e-commerce spec and become transactions."}));
            props.insert("properties".into(), json!({"type": "object"}));
            required.push("event");
        }
        Call::Page | Call::Screen => {
            props.insert("name".into(), json!({"type": "string"}));
            props.insert("properties".into(), json!({"type": "object"}));
        }
        Call::Group => {
            props.insert("groupId".into(), json!({"type": "string"}));
            props.insert("traits".into(), json!({"type": "object"}));
            required.push("groupId");
        }
        Call::Alias => {
            props.insert("previousId".into(), json!({"type": "string"}));
            required.extend(["previousId", "userId"]);
        }
    }
    json!({"type": "object", "properties": props, "required": required})
}

fn call_name(call: Call) -> &'static str {
    match call {
        Call::Identify => "identify",
        Call::Track => "track",
        Call::Page => "page",
        Call::Screen => "screen",
        Call::Group => "group",
        Call::Alias => "alias",
    }
}

fn responses() -> Value {
    json!({
        "200": {"description": "Every accepted event is acknowledged by the broker (durable). Batches list each rejected event.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
        "400": {"description": "Invalid request: each failing field by path.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}},
        "401": {"description": "Unknown or missing write key.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}},
        "413": {"description": "Body over the size limit.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}},
        "429": {"description": "The client's address failed to authenticate too often: nothing was read. Retry after Retry-After seconds.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}},
        "503": {"description": "The event log is unavailable; nothing was accepted. Retry after Retry-After seconds with the same messageIds.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}}
    })
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let schema = match route.kind {
            RouteKind::Segment(call) => {
                json!({"$ref": format!("#/components/schemas/{}", call_name(call))})
            }
            RouteKind::Batch => json!({"$ref": "#/components/schemas/Batch"}),
            RouteKind::Native => json!({"oneOf": [
                {"$ref": "#/components/schemas/NativeEvent"},
                {"type": "object", "properties": {"batch": {"type": "array", "items": {"$ref": "#/components/schemas/NativeEvent"}}}, "required": ["batch"]}
            ]}),
        };
        paths.insert(
            route.path.to_owned(),
            json!({"post": {
                "summary": route.summary,
                "operationId": route.path.trim_start_matches('/').replace('/', "_"),
                "security": [{"writeKey": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": schema}}},
                "responses": responses()
            }}),
        );
    }
    let mut schemas = Map::new();
    for call in Call::ALL {
        schemas.insert(call_name(call).to_owned(), segment_schema(call));
    }
    schemas.insert(
        "Batch".into(),
        json!({"type": "object", "required": ["batch"], "properties": {
            "batch": {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["identify", "track", "page", "screen", "group", "alias"]}}}},
            "writeKey": {"type": "string", "description": "Alternative to HTTP Basic auth."}}}),
    );
    let mut native_props = common_properties();
    native_props.insert(
        "type".into(),
        json!({"type": "string", "enum": NATIVE_TYPES}),
    );
    native_props.insert("identifiers".into(), json!({"type": "array", "items": {"type": "object", "required": ["kind", "value"], "properties": {
        "kind": {"type": "string", "enum": cdp_schemas::IdentifierKind::symbols()},
        "namespace": {"type": "string"}, "value": {"type": "string"}}}}));
    native_props.insert("payload".into(), json!({"type": "object", "description": "The contract record of the type, with the Avro field names (docs/events.md); PII fields as plaintext strings."}));
    schemas.insert(
        "NativeEvent".into(),
        json!({"type": "object", "required": ["type", "payload"], "properties": native_props}),
    );
    schemas.insert(
        "FieldError".into(),
        json!({"type": "object", "properties": {"path": {"type": "string"}, "reason": {"type": "string"}}}),
    );
    schemas.insert(
        "Errors".into(),
        json!({"type": "object", "properties": {"success": {"type": "boolean"}, "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}}}}),
    );
    schemas.insert(
        "Accepted".into(),
        json!({"type": "object", "properties": {
            "success": {"type": "boolean"}, "accepted": {"type": "integer"},
            "rejected": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "messageId": {"type": "string"},
                "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}}}}}}}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "cdp tracking API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Segment-compatible tracking API and native contract events. Authenticate with HTTP Basic: the write key as user name, an empty password. Bodies may be gzip-compressed."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"writeKey": {"type": "http", "scheme": "basic"}}}
    })
}
