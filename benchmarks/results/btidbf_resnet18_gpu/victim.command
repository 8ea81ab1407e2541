[gpu] victim: python3 -m lightning_defense fit --config configs/victims/cifar10_badnets_resnet18.yaml --trainer.max_epochs 15 --model.init_args.lr_milestones [10, 13] --data.init_args.num_workers 8 --trainer.logger.init_args.save_dir runs --trainer.max_time 00:00:02:33
[gpu] victim exit 0 after 108 s
a645039409454a83c7c1a670c0d1a3f1dc841c3697a53d1a69495c767d884871  runs/cifar10_badnets_resnet18/version_0/victim.safetensors
