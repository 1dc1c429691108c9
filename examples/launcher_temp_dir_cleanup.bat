@echo off
rem Write the edited config somewhere else and delete it when the run is over.
rem Run from anywhere; paths are relative to the repository root.
cd /d "%~dp0.."

python train_json_edit.py configs\base_settings.json ^
    --temp-config-dir "%TEMP%\cv_configs" ^
    --delete-temp-config
if errorlevel 1 exit /b %errorlevel%
