@echo off
rem uninstall-fmq-service.bat: removes the FerroMQ Windows service.
rem
rem   uninstall-fmq-service.bat              (service name: %FMQ_SERVICE_NAME% or FerroMQ)
rem
rem Provided for Windows hosts, mirroring FioranoMQ's service scripts. FerroMQ is
rem developed and tested on Linux; these Windows scripts are NOT tested here.
rem Run from an elevated (Administrator) command prompt. Stops the service
rem first (sc.exe stop) and then deletes it; the profile and its store are left
rem in place.

setlocal
if "%FMQ_SERVICE_NAME%"=="" set "FMQ_SERVICE_NAME=FerroMQ"

sc.exe query "%FMQ_SERVICE_NAME%" >nul 2>&1
if errorlevel 1 (
    echo uninstall-fmq-service: no service named %FMQ_SERVICE_NAME% 1>&2
    exit /b 1
)
sc.exe stop "%FMQ_SERVICE_NAME%" >nul 2>&1
rem Give the server time to close its store.
timeout /t 10 /nobreak >nul
sc.exe delete "%FMQ_SERVICE_NAME%"
if errorlevel 1 (
    echo uninstall-fmq-service: sc.exe delete failed 1>&2
    exit /b 1
)
echo Service %FMQ_SERVICE_NAME% removed.
endlocal
exit /b 0
