//! The OpenAPI 3.1 document of the API, generated from the route table and the model's types
//! (JSON Schema 2020-12, which OpenAPI 3.1 uses as is). `docs/api/openapi.json` is this
//! document checked in; a test fails when the two differ.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::error::ErrorBody;
use crate::routes::{Payload, ROUTES};

/// The document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    let error = generator.subschema_for::<ErrorBody>();
    let mut paths = Map::new();
    for route in ROUTES {
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "schema": {"type": "string"},
                })
            })
            .collect();
        parameters.extend(route.query.iter().map(|param| {
            json!({
                "name": param.name,
                "in": "query",
                "required": param.required,
                "description": param.description,
                "schema": {"type": param.kind},
            })
        }));
        let mut operation = json!({
            "operationId": format!("{:?}", route.op),
            "summary": route.summary,
            "responses": {
                route.status.to_string(): response(&route.response, &mut generator),
                "default": {
                    "description": "An error, with its stable code (docs/errors.md)",
                    "content": {"application/json": {"schema": error}},
                },
            },
        });
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if let Some(content) = content(&route.request, &mut generator) {
            operation["requestBody"] = json!({"required": true, "content": content});
        }
        let methods = paths
            .entry(route.path)
            .or_insert_with(|| Value::Object(Map::new()));
        methods[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mvm local API",
            "version": "1",
            "description": "Sandboxes (named microVMs), their commands and files, on a Unix \
                socket: $MVM_HOME/api.sock, served by `mvm serve` to the user who runs it.",
        },
        "paths": paths,
        "components": {"schemas": generator.take_definitions(true)},
    })
}

fn response(payload: &Payload, generator: &mut schemars::SchemaGenerator) -> Value {
    let mut answer = json!({"description": "Done"});
    if let Some(content) = content(payload, generator) {
        answer["content"] = content;
    }
    answer
}

fn content(payload: &Payload, generator: &mut schemars::SchemaGenerator) -> Option<Value> {
    match payload {
        Payload::Empty => None,
        Payload::Json(schema) => Some(json!({"application/json": {"schema": schema(generator)}})),
        Payload::Ndjson(schema) => Some(json!({
            "application/x-ndjson": {"schema": schema(generator)},
        })),
        Payload::Bytes => Some(json!({
            "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves_and_every_route_is_there() {
        let document = document();
        let text = document.to_string();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(schemas.contains_key(name), "{name} is not defined");
        }
        let operations: usize = document["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|methods| methods.as_object().unwrap().len())
            .sum();
        assert_eq!(operations, ROUTES.len());
    }
}
