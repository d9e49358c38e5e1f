//! Route lookup cost among 10,000 routes (target: under 1 µs). Run: `cargo bench --bench route_lookup`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use switchyard::backends::BackendSet;
use switchyard::config;
use switchyard::router::{Lookup, RouteTable};

fn table(n: usize) -> RouteTable {
    let mut yaml = String::from(
        "backends:\n  up: { type: http, endpoints: [\"http://127.0.0.1:9\"] }\nroutes:\n",
    );
    for i in 0..n {
        let path = match i % 4 {
            0 => format!("/svc{i}/v1/items/{{id}}"),
            1 => format!("/svc{i}/v1/items"),
            2 => format!("/svc{i}/v1/users/{{user}}/orders/{{order}}"),
            _ => format!("/svc{i}/static/{{*rest}}"),
        };
        yaml.push_str(&format!(
            "  - id: r{i}\n    match: {{ method: GET, path: \"{path}\" }}\n    backend: up\n"
        ));
    }
    let spec = config::load_str("bench.yaml", &yaml, &|_| None).expect("valid");
    let metrics = std::sync::Arc::new(switchyard::telemetry::metrics::Metrics::new());
    RouteTable::build(
        spec,
        1,
        &BackendSet::default(),
        &metrics,
        &switchyard::backends::BuildContext::new(std::path::Path::new(".")),
    )
    .expect("builds")
}

fn bench(c: &mut Criterion) {
    let t = table(10_000);
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("lookup_10k_routes");
    for (name, path) in [
        ("static", "/svc5001/v1/items"),
        ("param", "/svc5000/v1/items/42"),
        ("two_params", "/svc5002/v1/users/7/orders/99"),
        ("catch_all", "/svc5003/static/css/site.css"),
        ("miss", "/nope/at/all"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let found = matches!(
                    t.lookup(None, &Method::GET, black_box(path), &headers),
                    Lookup::Found { .. }
                );
                black_box(found)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
