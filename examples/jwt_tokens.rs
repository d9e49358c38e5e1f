//! Keys and tokens for the JWT benchmark (`bench/jwt.sh`): makes a fresh RSA 2048 key (RS256)
//! and a P-256 key (ES256), and writes `DIR/jwks.json` (their public keys) and
//! `DIR/rs256.token`, `DIR/es256.token` (one token each, valid for a day, `aud: bench`).
//! Usage: `jwt_tokens DIR`.
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: jwt_tokens DIR"));
    let rsa_pem = {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::PrivateKey::new(&mut rand::rngs::SysRng, 2048).expect("RSA key");
        key.to_pkcs8_pem(Default::default())
            .expect("PEM")
            .to_string()
    };
    let ec_pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("P-256 key")
        .serialize_pem();
    let keys = [
        (
            Algorithm::RS256,
            "rs",
            EncodingKey::from_rsa_pem(rsa_pem.as_bytes()),
        ),
        (
            Algorithm::ES256,
            "es",
            EncodingKey::from_ec_pem(ec_pem.as_bytes()),
        ),
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": "bench", "aud": "bench", "exp": now + 86_400 });
    let mut jwks = Vec::new();
    for (alg, kid, key) in keys {
        let key = key.expect("encoding key");
        let mut jwk = Jwk::from_encoding_key(&key, alg).expect("JWK");
        jwk.common.key_id = Some(kid.into());
        jwks.push(jwk);
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        let token = jsonwebtoken::encode(&h, &claims, &key).expect("token");
        let name = format!("{}.token", format!("{alg:?}").to_lowercase());
        std::fs::write(dir.join(name), token).expect("write the token");
    }
    std::fs::write(
        dir.join("jwks.json"),
        serde_json::to_string(&JwkSet { keys: jwks }).unwrap(),
    )
    .expect("write the JWKS");
}
