# lifeboat (RPM %preun): on erase (not upgrade), disable and stop the service.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now lifeboat.service >/dev/null 2>&1 || :
fi
