from django.http import JsonResponse


async def chat_completions(request):
    return JsonResponse({})


async def list_models(request):
    return JsonResponse({})
