@echo off
rem One base config, three learning rates: no extra JSON files to keep in step.
rem (--sweep train_learning_rate:[0.0001,0.00005,0.00001] does the same in one command.)
rem Run from anywhere; paths are relative to the repository root.
cd /d "%~dp0.."

python train_json_edit.py configs\base_settings.json --override train_learning_rate:0.0001
if errorlevel 1 exit /b %errorlevel%
python train_json_edit.py configs\base_settings.json --override train_learning_rate:0.00005
if errorlevel 1 exit /b %errorlevel%
python train_json_edit.py configs\base_settings.json --override train_learning_rate:0.00001
if errorlevel 1 exit /b %errorlevel%
