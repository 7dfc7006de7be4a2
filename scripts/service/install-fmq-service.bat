@echo off
rem install-fmq-service.bat: registers FerroMQ as a Windows service with sc.exe.
rem
rem   install-fmq-service.bat [PROFILE]        (default profile: FerroMQ)
rem
rem Provided for Windows hosts, mirroring FioranoMQ's service scripts. FerroMQ is
rem developed and tested on Linux; these Windows scripts are NOT tested here.
rem Known limits:
rem  * fmq.exe must be built for Windows first; the server currently watches
rem    Unix signals (crates/fmq-server/src/run.rs), so that needs porting.
rem  * sc.exe runs a binary that speaks the Windows service control protocol.
rem    fmq.exe is a console program, so point FMQ_SERVICE_WRAPPER at a service
rem    wrapper (e.g. WinSW or NSSM) configured to run fmq.exe; without one the
rem    service is created but fails to start (error 1053).
rem Run from an elevated (Administrator) command prompt.
rem
rem Settings (set them in the environment before running, or edit here):
rem   FMQ_HOME             installation directory holding bin\fmq.exe (default:
rem                        two levels above this script, scripts\service\)
rem   FMQ_SERVICE_NAME     service name (default FerroMQ)
rem   FMQ_SERVICE_WRAPPER  optional service wrapper executable (see above)

setlocal
if "%FMQ_HOME%"=="" set "FMQ_HOME=%~dp0..\.."
if "%FMQ_SERVICE_NAME%"=="" set "FMQ_SERVICE_NAME=FerroMQ"
set "FMQ_PROFILE=%~1"
if "%FMQ_PROFILE%"=="" set "FMQ_PROFILE=FerroMQ"
set "FMQ_EXE=%FMQ_HOME%\bin\fmq.exe"

if not exist "%FMQ_EXE%" (
    echo install-fmq-service: %FMQ_EXE% not found; set FMQ_HOME 1>&2
    exit /b 1
)

if "%FMQ_SERVICE_WRAPPER%"=="" (
    set "FMQ_BINPATH=\"%FMQ_EXE%\" -profile \"%FMQ_PROFILE%\""
) else (
    set "FMQ_BINPATH=\"%FMQ_SERVICE_WRAPPER%\""
)

sc.exe create "%FMQ_SERVICE_NAME%" binPath= "%FMQ_BINPATH%" start= auto DisplayName= "FerroMQ STOMP message broker"
if errorlevel 1 (
    echo install-fmq-service: sc.exe create failed 1>&2
    exit /b 1
)
sc.exe description "%FMQ_SERVICE_NAME%" "FerroMQ, a persistent STOMP message broker (profile %FMQ_PROFILE%)"
sc.exe failure "%FMQ_SERVICE_NAME%" reset= 86400 actions= restart/5000/restart/5000/restart/60000
echo Service %FMQ_SERVICE_NAME% installed. Start it with: sc.exe start %FMQ_SERVICE_NAME%
endlocal
exit /b 0
