from iam_grpc.cli import main

main()
