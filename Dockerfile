# A small image of Herald: build in rust:1-bookworm, run in debian:bookworm-slim.
#   docker build -t herald .
#   docker run -p 1883:1883 -v herald-data:/var/lib/herald -v $PWD/passwd:/etc/herald/passwd:ro herald
# docs/operations.md explains the configuration it ships with (contrib/config.toml).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY bench bench
COPY benches benches
RUN cargo build --release --locked --bin herald && strip target/release/herald

FROM debian:bookworm-slim
RUN useradd --system --home-dir /var/lib/herald --shell /usr/sbin/nologin herald \
    && mkdir -p /var/lib/herald /etc/herald && touch /etc/herald/passwd \
    && chown herald:herald /var/lib/herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
COPY contrib/config.toml /etc/herald/config.toml
USER herald
VOLUME /var/lib/herald
EXPOSE 1883
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/herald", "--config", "/etc/herald/config.toml"]
