# lifeboat (RPM %post): on first install apply the preset (the package's preset enables
# lifeboat.service; a distribution or site preset may say otherwise). The user comes from %pre.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset lifeboat.service >/dev/null 2>&1 || :
fi
