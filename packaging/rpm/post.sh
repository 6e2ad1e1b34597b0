# lifeboat (RPM %post): create the service user; on first install apply the preset (the package's
# preset enables lifeboat.service; a distribution or site preset may say otherwise).
getent group lifeboat >/dev/null || groupadd -r lifeboat
getent passwd lifeboat >/dev/null || useradd -r -g lifeboat -d /var/lib/lifeboat -M \
    -s /sbin/nologin -c "lifeboat backup agent" lifeboat
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset lifeboat.service >/dev/null 2>&1 || :
fi
