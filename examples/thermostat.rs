//! The example device for the MQTT bridge: `cargo run --example thermostat` (broker from
//! `MQTT_ADDR`, default 127.0.0.1:1883), then run Switchyard on the repository's routes.yaml and
//! `curl -X POST localhost:8080/v1/devices/kitchen/commands -d '{"setpoint":21}'` (request and
//! response over MQTT 5) or `curl localhost:8080/v1/devices/kitchen/telemetry` (the retained
//! last value).

mod device;

#[tokio::main]
async fn main() {
    let addr = std::env::var("MQTT_ADDR").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let _device =
        device::Device::start(&addr, "home", "kitchen", std::time::Duration::from_secs(5)).await;
    println!("thermostat `kitchen` answering home/kitchen/cmd, publishing home/kitchen/telemetry");
    tokio::signal::ctrl_c().await.ok();
}
