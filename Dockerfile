# One image for every Shipline service; docker-compose.yml picks the command.
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends git haproxy busybox-static \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY shipline shipline
COPY ingress ingress
COPY streams streams
COPY deployer deployer
COPY projections projections
COPY outbound outbound
COPY console console
COPY schemas schemas
RUN pip install --no-cache-dir -c requirements.lock .
ENV SHIPLINE_DATA_DIR=/data
CMD ["shipline", "--help"]
