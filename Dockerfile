# The lightbox binary, for docker-compose.yml (microservices mode).
# Build: docker build -t lightbox .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin lightbox

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 lightbox
COPY --from=build /src/target/release/lightbox /usr/local/bin/lightbox
USER lightbox
ENTRYPOINT ["lightbox"]
CMD ["serve", "--target", "all"]
