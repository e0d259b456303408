#!/bin/sh
# XNAT container start: write xnat-conf.properties from the environment (so the database password
# lives in the compose .env, not in the image), wait for PostgreSQL, then run Tomcat.
set -eu

: "${XNAT_DATASOURCE_URL:?set XNAT_DATASOURCE_URL, e.g. jdbc:postgresql://xnat-db/xnat}"
: "${XNAT_DATASOURCE_USERNAME:?set XNAT_DATASOURCE_USERNAME}"
: "${XNAT_DATASOURCE_PASSWORD:?set XNAT_DATASOURCE_PASSWORD (docker/.env)}"
XNAT_DB_HOST="${XNAT_DB_HOST:-xnat-db}"

mkdir -p "$XNAT_HOME/config"
umask 077
cat > "$XNAT_HOME/config/xnat-conf.properties" <<PROPERTIES
datasource.driver=org.postgresql.Driver
datasource.url=${XNAT_DATASOURCE_URL}
datasource.username=${XNAT_DATASOURCE_USERNAME}
datasource.password=${XNAT_DATASOURCE_PASSWORD}

hibernate.dialect=org.hibernate.dialect.PostgreSQL9Dialect
hibernate.hbm2ddl.auto=update
hibernate.show_sql=false
hibernate.cache.use_second_level_cache=true
hibernate.cache.use_query_cache=true

spring.http.multipart.max-file-size=1073741824
spring.http.multipart.max-request-size=1073741824
PROPERTIES
umask 022

until pg_isready -q -h "$XNAT_DB_HOST" -U "$XNAT_DATASOURCE_USERNAME"; do
    echo "xnat-web: waiting for PostgreSQL on $XNAT_DB_HOST" >&2
    sleep 3
done

CATALINA_OPTS="${CATALINA_OPTS:-} -Xms${XNAT_MIN_HEAP:-256m} -Xmx${XNAT_MAX_HEAP:-4g} -Dxnat.home=${XNAT_HOME}"
export CATALINA_OPTS
exec "$@"
