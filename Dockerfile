# Multi-stage build: compile in the full Rust image, run in a slim one as non-root.
# The build stage copies exactly what `cargo build --locked` needs to load the
# workspace (its members under crates/ included) and build the binary;
# `scripts/check-image-context` rebuilds this stage's context without Docker.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY crates crates
COPY src src
COPY migrations migrations
# e.g. `docker compose build --build-arg FEATURES=otlp` for OpenTelemetry export.
ARG FEATURES=""
RUN cargo build --release --locked --bin qty-worker --features "$FEATURES"

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home qty
COPY --from=build /src/target/release/qty-worker /usr/local/bin/qty-worker
USER 10001
ENV QTY_HTTP_ADDR=0.0.0.0:9464 \
    QTY_LOG_FORMAT=json
EXPOSE 9464
ENTRYPOINT ["qty-worker"]
CMD ["run"]
